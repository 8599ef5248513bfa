"""What users run: the pipeline behind generate.py, batch jobs, checkpoint conversion, the tiny random model.
May import every layer below (runtime/, model/, processing/); nothing imports it but tools/ and generate.py."""
