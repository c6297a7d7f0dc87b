-- Conversion through the checkout funnel: profiles reaching each step (each within 3 days of
-- the step before), the share of the step before that went on, and of those who started.
WITH journeys AS (
    SELECT profile_id,
           funnel(INTERVAL '3 days', "timestamp",
                  event = 'Product Viewed', event = 'Product Added',
                  event = 'Checkout Started', event = 'Order Completed') AS furthest_step
    FROM events
    WHERE profile_id IS NOT NULL
      AND event IN ('Product Viewed', 'Product Added', 'Checkout Started', 'Order Completed')
    GROUP BY profile_id
), steps AS (
    SELECT s.step, s.name, count(j.profile_id) AS profiles
    FROM (VALUES (1, 'Product Viewed'), (2, 'Product Added'),
                 (3, 'Checkout Started'), (4, 'Order Completed')) AS s(step, name)
    LEFT JOIN journeys j ON j.furthest_step >= s.step
    GROUP BY s.step, s.name
)
SELECT step, name, profiles,
       CAST(profiles AS DOUBLE) / nullif(lag(profiles) OVER (ORDER BY step), 0) AS from_previous_step,
       CAST(profiles AS DOUBLE) / nullif(first_value(profiles) OVER (ORDER BY step), 0) AS from_first_step
FROM steps
ORDER BY step
