"""Raw text to tokenizer, packed WebDataset shards and manifest (``bertforge prep``)."""
