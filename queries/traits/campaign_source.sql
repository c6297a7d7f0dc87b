-- First and last value: the campaign source that first brought the customer, and the latest.
SELECT profile_id,
       first_value(json_get_str(context, 'campaign', 'source') ORDER BY "timestamp", message_id) AS first_source,
       last_value(json_get_str(context, 'campaign', 'source') ORDER BY "timestamp", message_id) AS last_source
FROM events
WHERE json_get_str(context, 'campaign', 'source') IS NOT NULL
GROUP BY profile_id
