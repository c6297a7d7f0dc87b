-- Top paths: what people did next after adding a product to the cart in the last 7 days
-- (within the same 30-minute visit; "(left)" when nothing followed). The window function
-- sorts every event it reads by profile and time: keep the period short at scale.
WITH ordered AS (
    SELECT coalesce(event, type) AS action,
           "timestamp" AS at,
           lead(coalesce(event, type)) OVER (PARTITION BY profile_id ORDER BY "timestamp", message_id) AS next_action,
           lead("timestamp") OVER (PARTITION BY profile_id ORDER BY "timestamp", message_id) AS next_at
    FROM events
    WHERE profile_id IS NOT NULL AND "timestamp" >= as_of() - INTERVAL '7 days'
), next_steps AS (
    SELECT CASE WHEN next_at IS NULL OR next_at - at > INTERVAL '30 minutes' THEN '(left)'
                ELSE next_action END AS next_action
    FROM ordered
    WHERE action = 'Product Added'
)
SELECT next_action, count(*) AS times,
       CAST(count(*) AS DOUBLE) / sum(count(*)) OVER () AS share
FROM next_steps
GROUP BY next_action
ORDER BY times DESC, next_action
LIMIT 10
