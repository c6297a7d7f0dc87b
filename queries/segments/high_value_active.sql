-- Built on two other segments: big spenders who are still around.
SELECT h.profile_id, h.revenue_total, a.last_seen
FROM segments.high_value h
JOIN segments.active_30d a ON a.profile_id = h.profile_id
