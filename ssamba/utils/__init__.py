"""Run plumbing: config checks (``config``), W&B, launching, figures, atomic checkpoint IO."""
