// An ordinary grammY bot; only its API root points at the Meshgram bridge.
// Usage: node bot.js API_ROOT TOKEN  (API_ROOT is network.json's bot_api without "/bot")
import { Bot, InlineKeyboard, InputFile } from "grammy";

const [apiRoot, token] = process.argv.slice(2);
const bot = new Bot(token, { client: { apiRoot } });

bot.command("start", (ctx) => ctx.reply(`Hi ${ctx.from.first_name}, grammY here`));

bot.command("menu", (ctx) =>
  ctx.reply("Pick one", { reply_markup: new InlineKeyboard().text("Yes", "yes").text("No", "no") }),
);

bot.on("callback_query:data", async (ctx) => {
  await ctx.answerCallbackQuery({ text: `grammY got ${ctx.callbackQuery.data}` });
  await ctx.editMessageText(`Chosen: ${ctx.callbackQuery.data}`);
});

// Sent again by file_id: nothing is uploaded twice.
bot.on("message:photo", (ctx) => ctx.replyWithPhoto(ctx.msg.photo.at(-1).file_id, { caption: "your photo" }));

// Downloaded through getFile and the file route, then uploaded again.
bot.on("message:document", async (ctx) => {
  const file = await ctx.getFile();
  const response = await fetch(`${apiRoot}/file/bot${token}/${file.file_path}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const name = `copy-${ctx.msg.document.file_name}`;
  await ctx.replyWithDocument(new InputFile(bytes, name), { caption: `${bytes.length} bytes` });
});

bot.on("message:text", (ctx) => ctx.reply(`<i>echo</i>: ${ctx.msg.text}`, { parse_mode: "HTML" }));

bot.catch((err) => console.error("grammY bot error:", err.error));
console.log("grammY bot polling");
bot.start({ timeout: 10 });
