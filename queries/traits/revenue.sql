-- Sum, average, minimum and maximum of a property: what each customer spent.
SELECT profile_id,
       sum(json_get_float(properties, 'revenue')) AS revenue_total,
       avg(json_get_float(properties, 'revenue')) AS order_value_avg,
       min(json_get_float(properties, 'revenue')) AS order_value_min,
       max(json_get_float(properties, 'revenue')) AS order_value_max
FROM events
WHERE event = 'Order Completed'
GROUP BY profile_id
