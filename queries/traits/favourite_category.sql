-- Most frequent value: the category viewed most often (ties go to the first alphabetically).
SELECT profile_id, most_frequent(json_get_str(properties, 'category')) AS favourite_category
FROM events
WHERE event = 'Product Viewed'
GROUP BY profile_id
