"""What a stage module is written against: the Stage declaration, the cache and run store, errors,
and the names of every artifact. Imports nothing heavier than pydantic."""
