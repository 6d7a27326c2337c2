"""Coverage-guided fuzzing (atheris) of the three kinds of untrusted file llava-kv reads."""
