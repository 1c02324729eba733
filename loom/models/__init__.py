"""Model definitions, weight loaders and the default-model resolver. Never schedules."""
