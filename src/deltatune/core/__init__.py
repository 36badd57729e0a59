"""Method-independent machinery: configs, targeting, injection, layers, state mapping, IO, provenance."""
