"""voxsearch.ingest"""
