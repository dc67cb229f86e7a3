"""Wake and sleep for each user: the experience log (SQLite) and its consolidation into training sets.

  events       Event: one validated experience record (context, action, observation, feedback, reward)
  log          ExperienceLog: append / read / export / forget on SQLite (WAL), quarantine, notes
  consolidate  consolidate(): junk gate, near-duplicate removal, lessons, policy + world-model examples
"""
