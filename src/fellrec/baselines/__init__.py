"""Non-LLM reference recommenders (MostPopular, SASRec) and the shared full-ranking evaluation loop."""
