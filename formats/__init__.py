"""synpref.formats: on-disk dataset formats (WebDataset layouts, Pick-a-Pic parquet) and exporters."""
