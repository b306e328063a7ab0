"""Running a loaded model: loading pipelines (loading), speed options (optimize), compiling
(compile), what runs (report), batching and calls (scheduler: Task, WorkItem, LoadedModel,
buckets), memory sizing (memory) and the warm-up at load (warmup). Knows no request kind
beyond the Task interface: the built-in kinds live in tasks/."""
