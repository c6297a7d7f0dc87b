-- Viewed or added a product in the last 7 days and bought nothing in those 7 days.
WITH interested AS (
    SELECT profile_id, max("timestamp") AS last_interest
    FROM events
    WHERE event IN ('Product Viewed', 'Product Added')
      AND "timestamp" >= as_of() - INTERVAL '7 days' AND profile_id IS NOT NULL
    GROUP BY profile_id
), bought AS (
    SELECT DISTINCT profile_id
    FROM events
    WHERE event = 'Order Completed' AND "timestamp" >= as_of() - INTERVAL '7 days'
)
SELECT i.profile_id, i.last_interest
FROM interested i LEFT JOIN bought b ON b.profile_id = i.profile_id
WHERE b.profile_id IS NULL
