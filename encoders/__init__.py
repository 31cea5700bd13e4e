"""voxsearch.encoders"""
