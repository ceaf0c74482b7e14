"""Reference search: the shared search, the coordinate gallery, photo galleries and their build."""
