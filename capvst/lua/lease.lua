-- Hold or renew a lease: SET NX, or extend it when this holder already has it.
-- KEYS: lease key   ARGV: token, ttl in milliseconds
-- Returns 1 when the caller holds the lease.
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
