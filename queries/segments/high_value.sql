-- Customers who have spent 200 or more.
SELECT profile_id, revenue_total
FROM profiles
WHERE revenue_total >= 200
