"""Built-in search spaces (YAML files shipped as package data ``wsss_tune.search_spaces``)."""
