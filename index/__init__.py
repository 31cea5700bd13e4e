"""voxsearch.index"""
