"""Data: reading rows from files, `datasets` directories and the Hub, the layouts (prompts, pairs, chat), prompt
sets for online runs, and model-source resolution."""
