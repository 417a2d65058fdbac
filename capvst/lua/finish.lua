-- Close a finalized job: keep its summary, drop its per-line state, start its TTL.
-- KEYS: job, st, cx, inbox, deaths, slices, claims, late, active set
-- ARGV: ttl seconds, job id, late results consumed, then field/value pairs of the summary
-- Returns 0 (and changes nothing) when results arrived since the report was built.
if redis.call('LLEN', KEYS[4]) > 0 then return 0 end
if redis.call('LLEN', KEYS[8]) > tonumber(ARGV[3]) then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', KEYS[1], 'finalize_due', 'finalize_at', 'refinalize', 'expand_at')
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('SREM', KEYS[9], ARGV[2])
return 1
