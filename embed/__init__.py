"""voxsearch.embed"""
