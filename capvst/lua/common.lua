-- Shared by the job-state scripts (prepended to each when loaded).
-- A line's state is two bits in the string KEYS[2] (0 none, 1 failed, 2 skipped,
-- 3 succeeded); KEYS[3] holds one bit per line whose failure is 'cancelled'.
local NAMES = {'failed', 'skipped', 'succeeded'}

-- Apply one result: a better status replaces a worse one, anything else is ignored.
-- Returns 1 when the line's state changed.
local function apply(job, st, cx, inbox, deaths, line, rank, cancelled, record, push)
  local old = redis.call('BITFIELD', st, 'GET', 'u2', '#' .. line)[1]
  if rank <= old then return 0 end
  redis.call('BITFIELD', st, 'SET', 'u2', '#' .. line, rank)
  if old > 0 then redis.call('HINCRBY', job, 'n_' .. NAMES[old], -1) end
  redis.call('HINCRBY', job, 'n_' .. NAMES[rank], 1)
  if cancelled == 1 then
    redis.call('SETBIT', cx, line, 1)
  elseif old == 1 then
    redis.call('SETBIT', cx, line, 0)
  end
  if push then redis.call('RPUSH', inbox, record) end
  redis.call('HDEL', deaths, line)
  return 1
end

-- Mark the job due for finalize once expansion reached the end and every item is final.
local function complete(job, now, lease)
  local v = redis.call('HMGET', job, 'expanded', 'total', 'n_succeeded', 'n_failed',
                       'n_skipped', 'finalize_due')
  if v[1] == '1' and v[6] ~= '1' then
    local done = (tonumber(v[3]) or 0) + (tonumber(v[4]) or 0) + (tonumber(v[5]) or 0)
    if done >= (tonumber(v[2]) or 0) then
      redis.call('HSET', job, 'finalize_due', '1', 'finalize_at', now + lease,
                 'state', 'finalizing')
      return 1
    end
  end
  return 0
end
