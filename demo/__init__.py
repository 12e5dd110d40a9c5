"""synpref.demo: tiny offline models built from configs, and the end-to-end demo."""
