"""modelfleet operator: reconciles InferenceModels into engine builds, serving Deployments and autoscaling."""
