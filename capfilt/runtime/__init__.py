"""Running a step over shards: the task type, resume, the Ray executor, progress."""
