"""FELLRec's flexible storage: the LLM cut into a client head, a server trunk and a client tail,
run apart and joined by a transport that serialises and counts everything it carries."""
