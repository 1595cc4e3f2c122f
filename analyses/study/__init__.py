"""``unlearn-lens study``'s analysis, torch-free: do the signatures predict recovery?

Along the data flow: ``tables`` (signatures.csv and recovery.csv from an output tree: the report's
tidy signature table and each model's held-out headline recovery), ``prediction`` (leave-one-method-
out prediction from signatures, from behaviour alone and from the mean, scored with intervals),
``plots`` (predicted vs measured, coloured by method) and ``write`` (``write_study``: OUT/study/).
"""
