"""pipelines.eval.adherence: the demo's detector and score (the evaluate job's tests: test_evaluate.py)."""
