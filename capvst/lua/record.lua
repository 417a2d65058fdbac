-- Record item results.
-- KEYS: job, st, cx, inbox, deaths, late, active jobs
-- ARGV: now, lease, cancel token ('' when no record is a cancellation), push (1/0),
--       untrained (1 when a record was computed by the untrained network, else 0),
--       then per result: line, rank, cancelled (0/1), record JSON ('' with push 0)
-- Returns {changed, finalize due}; {-1, 0} for an unknown job.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local token, push = ARGV[3], ARGV[4] == '1'
-- said by `capvst status` while the job runs (the report says it per line and in total)
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'untrained', '1') end
local state = redis.call('HGET', KEYS[1], 'state')
local changed = 0
if state == 'done' or state == 'cancelled' then
  -- already reported: per-line state is gone; a result that may improve the report is kept
  -- for a re-finalize (a late copy of a chunk finishing after the report was written)
  for i = 6, #ARGV, 4 do
    if tonumber(ARGV[i + 1]) >= 2 and ARGV[i + 3] ~= '' then
      redis.call('RPUSH', KEYS[6], ARGV[i + 3])
      changed = changed + 1
    end
  end
  if changed > 0 and redis.call('HSETNX', KEYS[1], 'refinalize', '1') == 1 then
    redis.call('PERSIST', KEYS[1])
    redis.call('SADD', KEYS[7], string.sub(KEYS[1], 12))
    return {changed, 1}
  end
  return {changed, 0}
end
local cancel_ok = token ~= '' and redis.call('HGET', KEYS[1], 'cancelled') == token
for i = 6, #ARGV, 4 do
  local cancelled = tonumber(ARGV[i + 2])
  if cancelled == 0 or cancel_ok then
    changed = changed + apply(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[i],
                              tonumber(ARGV[i + 1]), cancelled, ARGV[i + 3], push)
  end
end
return {changed, complete(KEYS[1], now, lease)}
