"""The OpenAI Images API, a second dialect at the edge: OpenAI bodies in, the one typed request
and the same job flow inside, OpenAI's response and error shapes out."""
