"""Teachers and students, datasets, and cost profiling. Depends on nothing else in kdarena."""
