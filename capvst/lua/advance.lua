-- Commit one expanded slice: its failure records and counts, and the cursor after it.
-- KEYS: job, st, cx, inbox, deaths, slices
-- ARGV: epoch, offset, next offset, next line, eof (0/1), items, valid, now, lease,
--       then per failure record: line, rank, cancelled (0/1), record JSON
-- Returns -1 when another expansion owns the cursor, else finalize due (0/1).
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'cursor_offset')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return -1 end
local now, lease = tonumber(ARGV[8]), tonumber(ARGV[9])
for i = 10, #ARGV, 4 do
  apply(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[i], tonumber(ARGV[i + 1]),
        tonumber(ARGV[i + 2]), ARGV[i + 3], true)
end
redis.call('HSET', KEYS[6], ARGV[2], ARGV[6] .. ',' .. ARGV[7])
redis.call('HSET', KEYS[1], 'cursor_offset', ARGV[3], 'cursor_line', ARGV[4],
           'expand_at', now + lease)
if ARGV[5] == '1' then
  local total, valid = 0, 0
  for _, v in ipairs(redis.call('HVALS', KEYS[6])) do
    local comma = string.find(v, ',')
    total = total + tonumber(string.sub(v, 1, comma - 1))
    valid = valid + tonumber(string.sub(v, comma + 1))
  end
  redis.call('HSET', KEYS[1], 'expanded', '1', 'total', total, 'valid', valid,
             'max_line', tonumber(ARGV[4]) - 1)
  redis.call('HDEL', KEYS[1], 'expand_at')
  return complete(KEYS[1], now, lease)
end
return 0
