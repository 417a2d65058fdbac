-- Make lines whose failure is 'cancelled' unfinished again (resume of a cancelled job), for
-- the lines of one byte range of the cancelled bitmap, with string operations so that no
-- call runs long.
-- KEYS: job, st, cx   ARGV: first byte, last byte (of the cancelled bitmap)
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
local cx = redis.call('GETRANGE', KEYS[3], first, last)
if #cx == 0 then return 0 end
-- line L's status is bits 2L..2L+1 of st (most significant bit first): byte L / 4
local st_first = math.floor(first * 8 / 4)
local st = redis.call('GETRANGE', KEYS[2], st_first, math.floor(((last + 1) * 8 - 1) / 4))
local stb = {string.byte(st, 1, -1)}
local removed = 0
for i = 1, #cx do
  local v = string.byte(cx, i)
  if v ~= 0 then
    for b = 0, 7 do
      if bit.band(v, bit.rshift(0x80, b)) ~= 0 then
        local line = (first + i - 1) * 8 + b
        local j = math.floor(line / 4) - st_first + 1
        if j <= #stb then
          local shift = (3 - line % 4) * 2
          if bit.band(bit.rshift(stb[j], shift), 3) == 1 then
            stb[j] = bit.band(stb[j], bit.bnot(bit.lshift(3, shift)))
            removed = removed + 1
          end
        end
      end
    end
  end
end
if removed > 0 then
  redis.call('SETRANGE', KEYS[2], st_first, string.char(unpack(stb)))
  redis.call('HINCRBY', KEYS[1], 'n_failed', -removed)
end
redis.call('SETRANGE', KEYS[3], first, string.rep('\0', #cx))
return removed
