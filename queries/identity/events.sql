-- Identifiers that appear together on one event belong to one person.
-- Columns named after identifier types in tessera.toml become links; seen_at orders them.
SELECT
    message_id,
    anonymous_id,
    user_id,
    json_get_str(traits, 'email') AS email,
    json_get_str(traits, 'phone') AS phone,
    "timestamp" AS seen_at
FROM events
