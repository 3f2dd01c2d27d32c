"""Built-in word lists for the synthetic engine (short, common, sign-like text)."""

EN_WORDS = """open sale cafe coffee tea bakery books music hotel market garden exit welcome fresh new today
summer winter spring autumn night city river ocean light dream happy grand cinema studio gallery museum
pizza burger noodles sushi bread juice flowers travel school library station airport parking pharmacy
bank fitness yoga dance party festival concert launch start stop login submit cancel save search
download upload settings profile home menu order deliver free limited offer best quality local organic
craft vintage modern classic golden silver blue green star moon sun rain snow fire wind stone wood
""".split()

ZH_PHRASES = """你好 欢迎光临 咖啡 茶馆 书店 音乐 酒店 市场 花园 出口 新鲜 今天 夏天 冬天 春天 秋天 夜晚 城市
河流 海洋 梦想 快乐 电影院 工作室 画廊 博物馆 面包 果汁 鲜花 旅行 学校 图书馆 车站 机场 停车场 药店
银行 健身 瑜伽 舞蹈 派对 节日 音乐会 开始 停止 登录 提交 取消 保存 搜索 下载 上传 设置 主页 菜单
订单 免费 限时 优惠 品质 本地 有机 经典 金色 星星 月亮 太阳 下雨 雪花 火焰 山水 春节快乐 新年好
""".split()

# name -> (RGB, Chinese name)
COLOURS = {
    "white": ((245, 245, 240), "白色"),
    "black": ((20, 20, 24), "黑色"),
    "red": ((200, 35, 45), "红色"),
    "blue": ((30, 80, 190), "蓝色"),
    "green": ((30, 140, 70), "绿色"),
    "yellow": ((240, 205, 40), "黄色"),
    "orange": ((240, 130, 30), "橙色"),
    "purple": ((120, 50, 160), "紫色"),
    "pink": ((240, 150, 180), "粉色"),
    "grey": ((128, 128, 128), "灰色"),
    "navy": ((20, 30, 80), "深蓝色"),
    "cream": ((250, 240, 210), "米色"),
}
