"""Privacy accounting (imports neither torch nor triton)."""
