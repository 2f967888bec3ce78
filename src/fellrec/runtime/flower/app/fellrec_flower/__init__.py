"""fellrec's Flower app: the ServerApp and ClientApp entry points (the code is in fellrec.runtime.flower)."""
