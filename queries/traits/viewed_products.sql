-- Unique list and its count in a window: products viewed in the 30 days before as-of.
SELECT profile_id,
       array_agg(DISTINCT json_get_str(properties, 'product_id') ORDER BY json_get_str(properties, 'product_id')) AS viewed_products_30d,
       count(DISTINCT json_get_str(properties, 'product_id')) AS viewed_product_count_30d
FROM events
WHERE event = 'Product Viewed' AND "timestamp" >= as_of() - INTERVAL '30 days'
GROUP BY profile_id
