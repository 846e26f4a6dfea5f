"""Region operations on instance maps: adjacency, borders, merging pairs, superpixels."""
