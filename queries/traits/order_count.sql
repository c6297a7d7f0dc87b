-- Event counter in a window: orders in the 90 days before the run's as-of time.
SELECT profile_id, count(*) AS orders_90d
FROM events
WHERE event = 'Order Completed' AND "timestamp" >= as_of() - INTERVAL '90 days'
GROUP BY profile_id
