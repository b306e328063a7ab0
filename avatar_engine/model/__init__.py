"""What is done to a diffusers pipeline's modules: lifetime attention processors (attention),
regional conditioning (regional), cached text encoding (text), step caching (stepcache),
previews (preview), tiny pipelines built from config (tiny) and identity adapters (adapters/).
Nothing here schedules requests (runtime/) or knows request kinds (tasks/)."""
