"""The compression sweep (`python -m experiments.sweep`), one module per role.

plan       config checks and the units to run (method x ratio x task x mode)
store      the resumable results file, run tag and code fingerprint
tokens     what the model reads: the tasks' private ids, or the tasks as
           text in a checkpoint's own tokenizer (config.tokens)
task_data  one task's rows, prefill and uncompressed reference
units      one unit: compress the cache, ask the question, the row
metrics    numbers computed from rows and caches (KL, means, Pearson r)
loop       runs or resumes a sweep: plan -> store -> units -> report
report     the markdown summary and facts.json
figures    the sweep's PNG figures
"""
