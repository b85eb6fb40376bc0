"""Serving the exported SEAN decoder: decoder bundle, back-ends, and the Ray synthesis actor."""
