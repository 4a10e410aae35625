"""An ordinary python-telegram-bot echo bot; only its base URL points at the Meshgram bridge.

Usage: ptb_echo.py BASE_URL TOKEN [WEBHOOK_PORT]
(BASE_URL is network.json's bot_api, e.g. http://127.0.0.1:PORT/bot). With a port, the bot runs
in webhook mode: it sets its webhook to a server of its own on that port, with a secret token.
"""
import sys

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, ReplyKeyboardMarkup, Update
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes, MessageHandler, filters


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.message.reply_text(f"Hello {update.effective_user.first_name}, I am {context.bot.username}")


async def menu(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    keyboard = InlineKeyboardMarkup(
        [
            [InlineKeyboardButton("Yes", callback_data="yes"), InlineKeyboardButton("No", callback_data="no")],
            [InlineKeyboardButton("Docs", url="https://example.org/docs")],
        ]
    )
    await update.message.reply_text("Pick one", reply_markup=keyboard)


async def colors(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    keyboard = ReplyKeyboardMarkup([["Red", "Blue"]], one_time_keyboard=True, input_field_placeholder="a color")
    await update.message.reply_text("Pick a color", reply_markup=keyboard)


async def pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    await query.answer(f"You chose {query.data}")
    await query.edit_message_text(f"Chosen: {query.data} by {query.from_user.first_name}")


async def photo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    # Sent again by file_id: nothing is uploaded twice.
    await update.message.reply_photo(update.message.photo[-1].file_id, caption="your photo")


async def document(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    # Downloaded through getFile and the file route, then uploaded again.
    doc = update.message.document
    data = await (await doc.get_file()).download_as_bytearray()
    await update.message.reply_document(bytes(data), filename=f"copy-{doc.file_name}", caption=f"{len(data)} bytes")


async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    text = update.message.text
    if text == "edit me":
        draft = await update.message.reply_text("draft")
        await draft.edit_text("final")
    else:
        await update.message.reply_html(f"<b>echo</b>: {text}")


async def list_commands(app: Application) -> None:
    await app.bot.set_my_commands([("start", "Say hello"), ("menu", "Pick one"), ("colors", "Pick a color")])


def main() -> None:
    base_url, token = sys.argv[1], sys.argv[2]
    # The file base URL is the API's with /file before /bot, as Telegram's.
    file_url = base_url.removesuffix("/bot") + "/file/bot"
    app = Application.builder().token(token).base_url(base_url).base_file_url(file_url).post_init(list_commands).build()
    app.add_handler(CommandHandler("start", start))
    app.add_handler(CommandHandler("menu", menu))
    app.add_handler(CommandHandler("colors", colors))
    app.add_handler(CallbackQueryHandler(pressed))
    app.add_handler(MessageHandler(filters.PHOTO, photo))
    app.add_handler(MessageHandler(filters.Document.ALL, document))
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, echo))
    if len(sys.argv) > 3:
        port = int(sys.argv[3])
        print("ptb bot serving its webhook", flush=True)
        app.run_webhook(
            listen="127.0.0.1",
            port=port,
            url_path="hook",
            webhook_url=f"http://127.0.0.1:{port}/hook",
            secret_token="meshgram-test-secret",
        )
    else:
        print("ptb bot polling", flush=True)
        app.run_polling(poll_interval=0.0, timeout=10)


if __name__ == "__main__":
    main()
