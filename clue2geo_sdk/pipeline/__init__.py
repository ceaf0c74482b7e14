"""The Clue2Geo pipeline for one image: its phases, stages, cluemap, prompts, parsing, selection."""
