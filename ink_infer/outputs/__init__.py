"""What a run leaves: the ensemble, the threshold, RLE and submission.csv, probability maps, previews, the report's schema, progress and the summary table."""
