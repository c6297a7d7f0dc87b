-- Seen in the 30 days before the run's as-of time.
SELECT profile_id, last_seen
FROM profiles
WHERE last_seen >= as_of() - INTERVAL '30 days'
