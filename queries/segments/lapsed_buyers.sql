-- Bought before, but not in the 21 days before the run's as-of time.
SELECT profile_id, max("timestamp") AS last_order
FROM events
WHERE event = 'Order Completed' AND profile_id IS NOT NULL
GROUP BY profile_id
HAVING max("timestamp") < as_of() - INTERVAL '21 days'
