"""The competition pipeline: experiment configs, the run workspace, CV, pseudo-labels, pretraining, ensembles and their selection, tuning, submission, transfer and the results suite."""
